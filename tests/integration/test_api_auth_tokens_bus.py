"""Api1's token members on a real dbus-daemon: ApiClient to a service that derives from
TokenMethods, as zlayer-apid's does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemons.apid.auth import Authenticator
from daemons.apid.tokens import TokenMethods, TokenStore
from shared import bus as zbus
from shared.busdaemon import PrivateBus
from shared.clients import ApiClient
from shared.nodekey import NodeKey
from shared.wire.api import TokenCreate


class Service(TokenMethods):
    pass


def test_create_list_revoke_over_the_bus(private_bus: PrivateBus, tmp_path: Path) -> None:
    key = NodeKey(b"n" * 32)

    async def scenario() -> None:
        server = zbus.open_bus(private_bus.address)
        info = zbus.DAEMONS_BY_NAME["apid"]
        await server.request_name_async(info.bus_name, 0)
        service = Service()  # must stay referenced while exported
        service.export_to_dbus(info.object_path, server)
        client_bus = zbus.open_bus(private_bus.address)
        client = ApiClient(client_bus)
        try:
            with pytest.raises(zbus.UnavailableError, match="starting"):
                await client.list_tokens()
            store = TokenStore.open(tmp_path, key.signing_key)
            service.token_store = store
            authenticator = Authenticator(key.verifying_key, store)

            issued = await client.create_token(
                TokenCreate(name="deployer", role="operator", deployments=["web"])
            )
            caller, _ = authenticator.authenticate(f"Bearer {issued.token}")
            assert (caller.name, caller.role.label, caller.deployments) == (
                "deployer",
                "operator",
                frozenset({"web"}),
            )
            with pytest.raises(zbus.AlreadyExistsError):
                await client.create_token(TokenCreate(name="deployer", role="viewer"))
            with pytest.raises(zbus.InvalidArgumentError):
                await client.create_token(TokenCreate(name="-bad name", role="viewer"))
            listed = await client.list_tokens()
            assert [(t.name, t.revoked) for t in listed] == [("deployer", False)]

            revoked = await client.revoke_token("deployer")
            assert revoked.revoked
            with pytest.raises(Exception, match="revoked"):
                authenticator.authenticate(f"Bearer {issued.token}")
            with pytest.raises(zbus.NotFoundError, match="no token named ghost"):
                await client.revoke_token("ghost")
            # the revocation is on disk for the next start
            again = TokenStore.open(tmp_path, key.signing_key)
            assert [(t.name, t.revoked) for t in again.list()] == [("deployer", True)]
        finally:
            client_bus.close()
            server.close()

    asyncio.run(scenario())
