"""The launching side: launch options -> LaunchSpec -> argv -> one supervised launcher process, and the rank
wrapper, failure reports, elastic discovery and run lock around it. Imports no torch and nothing from train/
(tests/unit/test_layering.py holds it); this package imports nothing at import time.
"""
