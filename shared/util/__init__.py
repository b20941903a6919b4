"""Small pure helpers: atomic files, tables, token statistics."""
