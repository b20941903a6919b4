"""Flower client mods around the handlers: the wire log (outermost: what leaves, as it
leaves) and SecAgg+ masking."""
