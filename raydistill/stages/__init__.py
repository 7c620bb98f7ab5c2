"""The Ray layer: each module is one stage with `run(cfg) -> dict` (artifacts) and `main(cfg, args)` (CLI)."""
