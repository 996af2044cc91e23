#!/usr/bin/perl
# HTTP/3 from a real browser through the edge: headless Chromium, forced to QUIC for two names
# that the edge routes to two aioquic HTTP/3 servers by the SNI of Chromium's Initial packets
# (a post-quantum ClientHello, over two datagrams). No TCP listener exists on the edge's port:
# an answer can only have come over QUIC.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(wait_for);

my ($chromium) = grep { -x } map { "/usr/bin/$_" } qw(chromium chromium-browser);
plan skip_all => 'chromium is not installed (apt-get install chromium)' unless $chromium;
Edge::Test::quic_python()
    or plan skip_all => 'aioquic is not installed (nginx-test/prereqs makes a virtualenv with it)';
require POSIX;

my $t = Edge::Test->new;
my ($crt, $key) = $t->certificate('backend');
# Chromium accepts the backends' certificate by its public key's hash.
my $spki = `openssl x509 -pubkey -noout -in $crt | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64`;
chomp $spki;

$t->quic_peer('server', $t->port($_), "cluster-$_", $crt, $key) for qw(a b);

$t->write_routes('routes.json', <<"EOF2");
{
  "upstreams": {
    "a": {"servers": ["127.0.0.1:${\$t->port('a')}"]},
    "b": {"servers": ["127.0.0.1:${\$t->port('b')}"]}
  },
  "routes": {"a.test": "a", "b.test": "b"}
}
EOF2
$t->config(<<'EOF2', workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    server {
        listen 127.0.0.1:%%PORT_edge%% udp reuseport;
        edge_route quic;
        proxy_pass nginx_edge;
        proxy_timeout 2s;
        access_log %%TESTDIR%%/quic.log edge;
    }
EOF2
$t->run;
my $edge = $t->port('edge');

my $home = $t->dir . '/chromium';
sub browse {
    my ($name) = @_;
    my @cmd = ('timeout', '60', $chromium, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
        '--disable-dev-shm-usage', "--user-data-dir=$home", '--enable-quic',
        "--origin-to-force-quic-on=$name:443", "--host-resolver-rules=MAP $name:443 127.0.0.1:$edge",
        "--ignore-certificate-errors-spki-list=$spki", '--dump-dom', "https://$name/");
    my $pid = open(my $out, '-|') // die "fork: $!\n";
    if (!$pid) {
        open STDERR, '>>', $t->dir . '/chromium.log';
        exec(@cmd) or POSIX::_exit(127);
    }
    my $text = do { local $/; <$out> } // '';
    close $out;
    return $text;
}

like(browse('a.test'), qr/cluster-a/, 'Chromium over HTTP/3: a.test answered by cluster A')
    or diag($t->read_file('chromium.log'));
like(browse('b.test'), qr/cluster-b/, 'and b.test by cluster B');
my $log = wait_for(sub { my $l = $t->read_file('quic.log'); $l =~ /name=b\.test/ && $l }, 'the sessions logged');
like($log, qr/proto=quic name=a\.test route=a\.test upstream=nginx_edge alpn=h3 addr=127\.0\.0\.1:${\$t->port('a')} /,
    'logged as QUIC, ALPN h3, to cluster A');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');
done_testing;
