"""Appliance mode: the desktop's thin client, Samba, the VM image and seed."""
