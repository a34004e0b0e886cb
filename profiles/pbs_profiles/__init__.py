"""Named PBS presets and model aliases (TOML files shipped with the package)."""
