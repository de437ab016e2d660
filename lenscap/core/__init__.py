"""What every command shares: the dataset directory, the job driver, options, errors, results."""
