"""MRI brain application: 3D T1 selection, deepbet brain extraction, volumes and uncertainty out."""
