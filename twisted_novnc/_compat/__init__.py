"""Every use of a private name of Twisted, Autobahn or txpostgres, fenced in one place."""
