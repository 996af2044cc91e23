#!/usr/bin/perl
# `proxy_pass nginx_edge;`: the module's upstream group named statically (nginx then skips
# evaluating and parsing $edge_upstream on every connection). Routes to `servers` upstreams are
# balanced by the module; routes to `upstream {}` blocks are handed to the block's own
# balancer (round robin over two servers, hash, a dead server skipped as proxy_next_upstream
# says), on TLS and HTTP; the access log names the block and the server, as with
# `proxy_pass $edge_upstream;`.

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
    },
    routes => {
        'own.test' => 'own',
        'local.test' => 'vhosts',
        'h.test' => 'hashed',
        'f.test' => 'failing',
    },
    default => 'vhosts',
}));
$t->config(<<"EOF", workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    upstream vhosts { server 127.0.0.1:%%PORT_a%%; server 127.0.0.1:%%PORT_b%%; }
    upstream hashed { hash \$remote_addr; server 127.0.0.1:%%PORT_c%%; }
    upstream failing { server 127.0.0.1:$dead; server 127.0.0.1:%%PORT_c%% backup; }
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
is(http_get($http, 'h.test'), 'c', 'a hash block');
is(http_get($http, 'f.test'), 'c', "the block's dead server skipped for its backup");
like(http_get($http, 'nobody.test'), qr/^[ab]\z/, 'the default route to a block');

my $log = $t->read_file('access.log');
my $a = $t->port('a');
like($log, qr/name=local\.test route=local\.test upstream=vhosts alpn=\S* addr=127\.0\.0\.1:(?:$a|${\ $t->port('b')}) status=200/,
    'the access log names the block and its server');
like($log, qr/name=own\.test route=own\.test upstream=nginx_edge alpn=\S* addr=127\.0\.0\.1:${\ $t->port('s')} status=200/,
    'and the module group for a servers route');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');
done_testing;
