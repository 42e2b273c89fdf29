"""The core that training and serving import, knowing nothing of TorchServe, HTTP or command lines; archives
ship it whole, so a worker runs exactly the code its archive was built with."""
