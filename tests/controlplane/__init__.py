"""Real servers for tests: a Kubernetes control plane built from Go modules, and SeaweedFS for S3.

Imported as the package ``controlplane`` (pytest puts tests/ on sys.path through tests/conftest.py;
tests/controlplane/up.py does the same for people).
"""
