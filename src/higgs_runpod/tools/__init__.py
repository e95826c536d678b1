"""What a person runs: the command line, the endpoint client, deploy."""
