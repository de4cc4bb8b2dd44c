"""Session enricher: Snowplow ``client_session`` entities computed server-side."""

__version__ = "0.1.0"
