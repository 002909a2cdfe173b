"""ReST-EM (`algorithm`) and its M-step selection and loss (`losses`)."""
