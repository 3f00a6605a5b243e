"""Where a run lives: storage URIs and filesystems (`storage`), checkpoint files (`checkpoint`), metrics and plots next to them (`monitoring`)."""
