"""lowres-kd: knowledge inheritance from several vision teachers into one student, on one small GPU."""
__version__ = "0.1.0"
