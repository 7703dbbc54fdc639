"""Config plumbing shared by every process package: the strict pydantic base of each sub-config."""
