"""The ground floor: errors, storage (local or gs://), crash-safe logs, typed config loading, process setup."""
