"""TCCP: two-stage cross-modal control generation of talking faces in context."""

__version__ = "0.1.0"
