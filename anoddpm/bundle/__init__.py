"""The model bundle ``model.pt``: what training writes and every other step reads (``store``: save, load, update the
calibration), and the checks a file passes before anything in it is used (``checks``)."""
from anoddpm.bundle.store import Bundle, bundle_payload, load_bundle, save_bundle, update_threshold

__all__ = ["Bundle", "bundle_payload", "load_bundle", "save_bundle", "update_threshold"]
