"""reports: the campaign behind `pmixed demo` and the compliance report."""
