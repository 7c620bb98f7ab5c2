"""Code that runs INSIDE the sandbox (zygote, family warden, interpreter).

Standard library only, and nothing from the rest of raydistill: this directory is bind-mounted read-only
into the sandbox and imported there as the top-level package `guest`. The host imports `guest.protocol`
through `raydistill.sandbox.guest.protocol` (same file) so both ends share one framing implementation.
"""
