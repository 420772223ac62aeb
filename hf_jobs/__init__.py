"""Running a package build on Hugging Face Jobs."""
