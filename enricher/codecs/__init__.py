"""Event codecs: bytes in, :class:`~enricher.codecs.tracker.TrackerEvent` out, and back."""
