"""Run configs (ml_collections, `get_config()`); installed as `clawjax.configs`."""
