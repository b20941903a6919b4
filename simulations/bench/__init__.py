"""``fedpersona bench``: performance as ratios of variants measured side by side."""
