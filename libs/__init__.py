"""Code shared by every tollgate service: settings, serving, errors, deadlines, breakers."""
