"""Input: random-access sources of (uint8 HWC image, label) and grain pipelines that batch them per process."""
