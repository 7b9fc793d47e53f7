"""`loraplex serve` and `loraplex generate` (attached by `loraplex/cli.py` via `register`).

    loraplex serve --base ./base --registry ./.loraplex/registry --port 50051 --metrics-port 9090
    loraplex generate --adapter acme/support@prod "Where is my order?" --stream --token lpx_...
    loraplex generate --chat --system "Answer in one word." "Which desk handles refunds?"

Unset flags fall back to `LORAPLEX_*` environment variables, then to `--config FILE`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("generate")(generate)


def serve(
    base: Path = typer.Option(None, help="Hugging Face model directory of the base."),
    registry: str = typer.Option(None, help="Registry directory or SQLAlchemy URL."),
    blob_dir: str = typer.Option(None, help="Blob directory or s3://bucket/prefix (for a "
                                 "database URL registry)."),
    host: str = typer.Option(None, help="gRPC listen address (default 0.0.0.0)."),
    port: int = typer.Option(None, help="gRPC port (default 50051); 0 picks a free one."),
    metrics_port: int = typer.Option(None, help="Prometheus /metrics port (default 9090)."),
    http_port: int = typer.Option(None, help="OpenAI-compatible HTTP port (/v1/completions, "
                                  "/v1/chat/completions, /v1/models); off by default."),
    no_auth: bool = typer.Option(None, "--no-auth/--auth",
                                 help="Every caller is an admin (local experiments only)."),
    quantization: str = typer.Option(None, help="nf4 | int8 | none (default nf4)."),
    device: str = typer.Option(None, help="auto | cpu | cuda | cuda:N (default auto)."),
    grace_s: float = typer.Option(None, help="SIGTERM: seconds to finish in-flight calls."),
    config: Path = typer.Option(None, help="YAML or TOML file of server settings."),
    ray: bool = typer.Option(None, "--ray/--no-ray",
                             help="Engines as Ray Serve replicas behind this gRPC ingress."),
    replicas: int = typer.Option(None, help="--ray: engine replicas (default 2)."),
    tls_cert: Path = typer.Option(None, help="PEM certificate chain: every door speaks TLS."),
    tls_key: Path = typer.Option(None, help="PEM private key of --tls-cert."),
    tls_client_ca: Path = typer.Option(None, help="PEM CA: require client certificates it "
                                       "signed (mutual TLS)."),
    metrics_host: str = typer.Option(None, help="/metrics listen address (default 127.0.0.1)."),
    http_host: str = typer.Option(None, help="OpenAI HTTP listen address (default 0.0.0.0)."),
    console: bool = typer.Option(None, "--console/--no-console",
                                 help="The web console under /console/ on the HTTP port "
                                 "(on by default)."),
    no_auth_on_public_interfaces_i_understand: bool = typer.Option(
        None, "--no-auth-on-public-interfaces-i-understand",
        help="Allow --no-auth with a listener on a non-loopback address (anyone who reaches "
        "it is an admin)."),
) -> None:
    """Serve inference, registry and admin over gRPC, and /metrics over HTTP."""
    from loraplex.runtime.serve.server import exit_process
    from loraplex.runtime.serve.settings import load_settings

    flags = dict(base=base, registry=registry, blob_dir=blob_dir, host=host, port=port,
                 metrics_port=metrics_port, http_port=http_port, no_auth=no_auth,
                 quantization=quantization, device=device, grace_s=grace_s, ray=ray,
                 replicas=replicas, tls_cert=tls_cert, tls_key=tls_key,
                 tls_client_ca=tls_client_ca, metrics_host=metrics_host, http_host=http_host,
                 console=console,
                 no_auth_on_public_interfaces_i_understand=no_auth_on_public_interfaces_i_understand)
    settings = load_settings(flags, config)  # a typed error: one line (loraplex/cli_errors.py)
    if settings.base is None:
        raise typer.BadParameter("--base DIR is required (or LORAPLEX_BASE)")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.ray:  # engines as Ray Serve replicas behind this process's doors
        from loraplex.runtime.fleet import ray_serve

        exit_process(ray_serve.run(settings))
    from loraplex.runtime.serve.server import serve as run_server

    exit_process(run_server(settings))  # drained: skip the slow interpreter teardown


def generate(
    prompt: str = typer.Argument(..., help="Prompt text (with --chat: the user's turn)."),
    adapter: str = typer.Option("", help="Adapter ref (t/n@prod, t/n:v3); empty: the base."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they arrive."),
    target: str = typer.Option("localhost:50051", envvar="LORAPLEX_TARGET",
                               help="Server host:port."),
    token: str = typer.Option(None, envvar="LORAPLEX_TOKEN", help="API token."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, help="0: greedy."),
    top_p: float = typer.Option(None, help="Nucleus sampling mass."),
    seed: int = typer.Option(None, help="Sampling seed."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    timeout: float = typer.Option(60.0, help="Deadline in seconds."),
    chat: bool = typer.Option(False, "--chat", help="Send chat messages (the server renders "
                              "them with the base's chat template) instead of raw text."),
    system: list[str] = typer.Option([], help="With --chat: a system message (repeatable)."),
    tls_ca: Path = typer.Option(None, envvar="LORAPLEX_TLS_CA", help="PEM CA bundle: talk "
                                "TLS and verify the server with it."),
    tls: bool = typer.Option(False, "--tls", envvar="LORAPLEX_TLS",
                             help="Talk TLS, verifying the server with the system's roots."),
    tls_cert: Path = typer.Option(None, envvar="LORAPLEX_TLS_CERT",
                                  help="PEM client certificate (mutual TLS)."),
    tls_key: Path = typer.Option(None, envvar="LORAPLEX_TLS_KEY",
                                 help="PEM private key of --tls-cert."),
) -> None:
    """Generate text with an adapter on a running server."""
    from loraplex.client import Client

    if system and not chat:
        raise typer.BadParameter("--system needs --chat", param_hint="--system")
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
              stop=stop, timeout=timeout)
    if chat:
        kw["messages"] = chat_messages(prompt, system)
        prompt = None
    with Client(target, token=token or os.environ.get("LORAPLEX_TOKEN"), tls=tls or None,
                tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as client:
        if stream:
            final = None
            for chunk in client.stream(adapter or None, prompt, **kw):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                final = chunk.final or final
            sys.stdout.write("\n")
        else:
            final = client.generate(adapter or None, prompt, **kw)
            typer.echo(final.text)
    if final is not None:
        typer.echo(f"[{final.adapter_ref or 'base'} · {final.finish_reason} · "
                   f"{final.completion_tokens} tokens · ttft {final.timings['first_token_s']:.3f}s"
                   f" · total {final.timings['total_s']:.3f}s]", err=True)


def chat_messages(user: str, system: list[str]) -> list[dict[str, str]]:
    """`--system` texts, then the positional text as the user's turn. Several `--system`
    options join into one system message: templates accept a system turn only first."""
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + [{"role": "user", "content": user}]
