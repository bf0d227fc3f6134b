"""Iterable API access. `client` sends, paces and retries; `responses` classifies what comes back;
`payloads` builds request bodies and reads bulk answers; `dates` converts dates; `ratelimit` paces
per endpoint; `transports` holds the dry-run transport. Import the submodule you need."""
