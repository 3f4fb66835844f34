"""What every group shares: config, hardware, launching, errors, I/O and console output."""
