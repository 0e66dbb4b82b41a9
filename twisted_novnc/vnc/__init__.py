"""The RFB (VNC) handshakes the proxy speaks when it holds a VM's credentials.

Socket-free state machines, fed bytes by the relay's driver: ``vm_login`` logs in to the VM's
VNC server as a client, ``browser_greeting`` greets the browser as a server offering security
type None only, and ``vncauth`` holds the DES of VNC Authentication.
"""
