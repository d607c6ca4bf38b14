"""Drivers that compose the floors below: :func:`fit`, :func:`collect`, :func:`capture`, the EK-FAC pass."""
