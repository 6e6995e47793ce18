"""The booking service: therapists' availability, sessions, and the two-phase credit protocol."""
