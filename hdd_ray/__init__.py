"""hdd_ray."""
