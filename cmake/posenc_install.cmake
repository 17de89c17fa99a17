# placeholder, filled by the packaging work
