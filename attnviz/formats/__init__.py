"""Container readers. Each turns one file into a ``LoadedFile``: an object tree whose tensor
leaves are ``TensorRef`` records, plus where each storage's bytes sit in the file."""
