"""Text into token files: Tiny Shakespeare (bundled), any UTF-8 file, OpenWebText. Torch-free."""
