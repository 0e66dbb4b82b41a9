"""Session recording (``[record]``): what each browser saw, kept for an audit and played back."""
