"""Placeholder replaced below."""
def run_stages(out, stages, cfg):
    raise SystemExit("sae stages not built yet")
