"""One module per method; each exposes `Config` (its config schema) and `Recipe`."""
