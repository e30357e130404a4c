"""libvirt hosts: a second engine behind :class:`thalunix.engine.Engine`, the host list, and moves between them.

``hosts`` keeps the host list (``hosts.json``) and opens connections (with a timeout, in a thread); ``engine``
has :class:`~thalunix.libvirt.engine.LibvirtEngine`; ``xml`` maps the model to domain XML in place; ``move``
moves a VM between the portable folder and a host. libvirt-python is optional and imported only on first use.

Example::

    from thalunix.libvirt.hosts import HostManager
    engine = HostManager(data).engine("lab")
"""
