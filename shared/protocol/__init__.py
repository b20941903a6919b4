"""What travels in Flower messages: record names, the settings record, adapters as
records, the checks on a reply, and the wire audit's rules. The only part of shared/
that imports Flower."""
