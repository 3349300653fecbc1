"""``retrieval pdq``: PDQ hash lists in and out (``export``: the gallery's hashes as the CSV that
hash-sharing tools exchange; ``match``: a partner's list against the gallery's PDQ index)."""
