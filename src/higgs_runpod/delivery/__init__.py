"""Where finished audio goes: inline, or to S3."""
