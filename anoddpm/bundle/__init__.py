"""The model bundle ``model.pt``: what training writes and every other step reads (``store``: save, load, update the
calibration), and the checks a file passes before anything in it is used (``checks``: intact, finite weights, a
calibration that belongs to them)."""
from anoddpm.bundle.checks import calibration_fingerprint
from anoddpm.bundle.store import Bundle, bundle_payload, load_bundle, save_bundle, update_threshold

__all__ = ["Bundle", "bundle_payload", "calibration_fingerprint", "load_bundle", "save_bundle", "update_threshold"]
