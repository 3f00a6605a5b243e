"""Where a run lives: its folder, storage URIs and filesystems (`location`), checkpoint files (`checkpoint`), their
upload from the workers (`storage`), metrics and plots next to them (`monitoring`)."""
