"""What several test modules share: tiny models built offline, run folders, training launches, data files."""
