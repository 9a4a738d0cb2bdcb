"""Reading photos and masks; joint image+mask transforms."""
