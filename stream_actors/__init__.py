"""Camera sources, the latest-frame mailbox, reconnect policy and object stability.

The pure modules here (mailbox, reconnect, stability) are used by the camera actors
(issue 4) and are tested without Ray.
"""
