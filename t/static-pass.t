#!/usr/bin/perl
# `proxy_pass nginx_edge;`: the module's upstream group named statically (nginx then skips
# evaluating and parsing $edge_upstream on every connection). Routes to `servers` upstreams are
# balanced by the module; routes to `upstream {}` blocks are handed to the block's own
# balancer (round robin over two servers, hash by client address, a dead server skipped as
# proxy_next_upstream says, a block with a zone), on TLS and HTTP; the access log names the
# block and the server, as with `proxy_pass $edge_upstream;`.

use strict;
use warnings;
use Test::More;
use JSON::PP;
use Edge::Test qw(client_hello tls_records http_get raw_exchange);

my $t = Edge::Test->new;
my $dead = $t->port('dead');
$t->write_routes('routes.json', encode_json({
    upstreams => {
        own => { servers => ['127.0.0.1:' . $t->port('s')] },
        vhosts => { nginx_upstream => 'vhosts' },
        hashed => { nginx_upstream => 'hashed' },
        failing => { nginx_upstream => 'failing' },
        zoned => { nginx_upstream => 'zoned' },
    },
    routes => {
        'own.test' => 'own',
        'local.test' => 'vhosts',
        'h.test' => 'hashed',
        'f.test' => 'failing',
        'z.test' => 'zoned',
    },
    default => 'vhosts',
}));
$t->config(<<"EOF", workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    upstream vhosts { server 127.0.0.1:%%PORT_a%%; server 127.0.0.1:%%PORT_b%%; }
    # The client's address picks one of two servers, and keeps it.
    upstream hashed { hash \$remote_addr; server 127.0.0.1:%%PORT_a%%; server 127.0.0.1:%%PORT_b%%; }
    upstream failing { server 127.0.0.1:$dead; server 127.0.0.1:%%PORT_c%% backup; }
    # A block in shared memory: nginx copies its peer's name out of the zone for the session.
    upstream zoned { zone zoned 64k; server 127.0.0.1:%%PORT_c%%; }
    server { listen 127.0.0.1:%%PORT_http%%; edge_route http; proxy_pass nginx_edge; }
    server { listen 127.0.0.1:%%PORT_tls%%; edge_route tls; proxy_pass nginx_edge; }
    server { listen 127.0.0.1:%%PORT_s%%; return "s"; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
    server { listen 127.0.0.1:%%PORT_b%%; return "b"; }
    server { listen 127.0.0.1:%%PORT_c%%; return "c"; }
EOF
$t->run;
my ($http, $tls) = ($t->port('http'), $t->port('tls'));

is(http_get($http, 'own.test'), 's', 'a servers route: the module balances');
is(raw_exchange($tls, [tls_records(client_hello(sni => 'own.test'))]), 's', 'and over TLS');
# With 2 workers, each keeps its own round robin: 8 connections reach both servers.
my %seen;
$seen{http_get($http, 'local.test')}++ for 1 .. 8;
is_deeply([sort keys %seen], ['a', 'b'], 'an upstream{} block: its round robin reaches both servers');
my %tls;
$tls{raw_exchange($tls, [tls_records(client_hello(sni => 'local.test'))])}++ for 1 .. 8;
is_deeply([sort keys %tls], ['a', 'b'], 'and over TLS');
# From each of 4 addresses, 4 connections: one server per address, the same every time.
my (%by_client, %servers);
for my $n (1 .. 4) {
    for (1 .. 4) {
        my $got = http_get($http, 'h.test', local => "127.0.0.$n");
        $by_client{$n}{$got}++;
        $servers{$got}++;
    }
}
is_deeply([map { scalar keys %{$by_client{$_}} } 1 .. 4], [1, 1, 1, 1],
    'a hash block: each client address keeps its server');
ok(!grep({ !/^[ab]\z/ } keys %servers), "and only the block's servers answer");
is(http_get($http, 'f.test'), 'c', "the block's dead server skipped for its backup");
is(http_get($http, 'z.test'), 'c', 'a block with a zone');
like(http_get($http, 'nobody.test'), qr/^[ab]\z/, 'the default route to a block');

my $log = $t->read_file('access.log');
my ($pa, $pb, $pc) = map { $t->port($_) } qw(a b c);
like($log, qr/name=local\.test route=local\.test upstream=vhosts alpn=\S* addr=127\.0\.0\.1:(?:$pa|$pb) status=200/,
    'the access log names the block and its server');
like($log, qr/name=f\.test route=f\.test upstream=failing alpn=\S* addr=127\.0\.0\.1:$dead, 127\.0\.0\.1:$pc status=200/,
    "the block's own retry: the dead server, then its backup");
like($log, qr/name=z\.test route=z\.test upstream=zoned alpn=\S* addr=127\.0\.0\.1:$pc status=200/,
    "the zone block's server, copied out of shared memory");
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');
done_testing;
