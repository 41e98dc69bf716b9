"""The Dagster layer: assets, checks, partitions, resources, sensors and jobs over fineinstructions_core."""
