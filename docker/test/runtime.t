#!/usr/bin/perl
# The runtime images nginx-edge:bookworm and nginx-edge:trixie keep their contract: routes
# from a folder mounted at /etc/nginx/edge/routes.d/ (empty: nothing routes), TLS routed by SNI
# on 443 and HTTP by Host on 80, re-read without a restart, the HEALTHCHECK against
# edge_status, nginx.conf replaceable by a mount, logs on stdout and stderr, SIGQUIT a clean
# stop. Everything runs on a network of its own; the backend is the same image with its
# nginx.conf replaced.
#
#   prove -I nginx-test/lib docker/test/runtime.t      (EDGE_RELEASES="bookworm trixie")

use strict;
use warnings;
use Test::More;
use File::Temp ();
use Edge::Docker qw(docker docker_ok ip_of health_of exchange tls_exchange in_container wait_for);

my @releases = split ' ', ($ENV{EDGE_RELEASES} // 'bookworm trixie');
for my $r (@releases) {
    docker('image', 'inspect', "nginx-edge:$r");
    plan skip_all => "nginx-edge:$r is not built (docker/images $r)" if $?;
}

my $dir = File::Temp::tempdir('edge-runtime-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;
my (@containers, @networks);
END {
    local $?;
    docker('rm', '-f', @containers) if @containers;
    docker('network', 'rm', @networks) if @networks;
}

sub write_file {
    my ($path, $text) = @_;
    open(my $fh, '>', "$path.tmp") or die "$path: $!";
    print $fh $text;
    close $fh;
    chmod 0644, "$path.tmp";
    rename "$path.tmp", $path or die "rename $path: $!";
}

sub routes {
    my ($backend, @names) = @_;
    my $routes = join ', ', map { qq("$_": "backend") } @names;
    return qq({"version": 1, "upstreams": {"backend": {"servers": ["$backend"]}}, "routes": {$routes}}\n);
}

sub status_of {
    my ($name) = @_;
    return in_container($name, 'bash', '-c',
        'exec 3<>/dev/tcp/127.0.0.1/8099; printf "GET /status HTTP/1.0\r\n\r\n" >&3; cat <&3');
}

sub nginx_version {
    my ($image) = @_;
    my $v = docker_ok('run', '--rm', '--entrypoint', 'nginx', $image, '-v');
    return $v =~ m{nginx/(\S+)} ? $1 : '?';
}

sub request { "GET / HTTP/1.0\r\nHost: $_[0]\r\n\r\n" }
sub body { $_[0] =~ s/^.*?\r\n\r\n//sr }

system("openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=smoke-backend -days 2 "
    . "-keyout $dir/backend.key -out $dir/backend.crt >/dev/null 2>&1") == 0 or die "openssl failed";
chmod 0644, "$dir/backend.key";
# The backend: the same image, its nginx.conf replaced by a plain http {} server.
write_file("$dir/backend.conf", <<'CONF');
events {}
error_log stderr;
http {
    access_log off;
    default_type text/plain;
    server { listen 80; return 200 "backend http $host\n"; }
    server {
        listen 443 ssl;
        ssl_certificate /certs/backend.crt;
        ssl_certificate_key /certs/backend.key;
        return 200 "backend tls $ssl_server_name\n";
    }
}
CONF

for my $release (@releases) {
    my $image = "nginx-edge:$release";
    my $tag = "edge-runtime-$$-$release";
    note("$image: nginx " . nginx_version($image));
    docker_ok('network', 'create', $tag);
    push @networks, $tag;

    docker_ok('run', '-d', '--name', "$tag-backend", '--network', $tag,
        '-v', "$dir/backend.conf:/etc/nginx/nginx.conf:ro", '-v', "$dir:/certs:ro", $image);
    push @containers, "$tag-backend";
    my $backend = ip_of("$tag-backend");

    my $routes_d = "$dir/$release.routes.d";
    mkdir $routes_d;
    chmod 0755, $routes_d;
    write_file("$routes_d/10-smoke.json", routes($backend, 'a.test'));
    docker_ok('run', '-d', '--name', "$tag-edge", '--network', $tag,
        '-v', "$routes_d:/etc/nginx/edge/routes.d:ro", $image);
    push @containers, "$tag-edge";
    my $edge = ip_of("$tag-edge");

    wait_for(sub { health_of("$tag-edge") eq 'healthy' }, "$tag-edge healthy", 120);
    pass("$release: the HEALTHCHECK says healthy");

    is(body(exchange($edge, 80, request('a.test'))), "backend http a.test\n", "$release: HTTP on :80 routed by Host");
    my ($answer, $subject) = tls_exchange($edge, 443, 'a.test', request('a.test'));
    is(body($answer), "backend tls a.test\n", "$release: TLS on :443 routed by SNI and passed through");
    like($subject, qr/CN ?= ?smoke-backend/, "$release: the client saw the backend's certificate");
    is(exchange($edge, 80, request('b.test')), '', "$release: a name without a route is closed");
    like(status_of("$tag-edge"), qr/"routes":\s*1\b/, "$release: edge_status answers on 127.0.0.1:8099 inside");

    # A new route file, renamed into place: served without a restart or a reload.
    write_file("$routes_d/10-smoke.json", routes($backend, 'a.test', 'b.test'));
    wait_for(sub { body(exchange($edge, 80, request('b.test'))) eq "backend http b.test\n" }, 'b.test routed');
    pass("$release: a rewritten route file is served");
    my $logs = docker('logs', "$tag-edge");
    unlike($logs, qr/signal 1 \(SIGHUP\)|reconfiguring/, "$release: without an nginx reload");

    # The access log on stdout, the error log on stderr.
    my $stdout = docker({ stdout => 1 }, 'logs', "$tag-edge");
    like($stdout, qr/ http a\.test route=a\.test upstream=\Q$backend\E:80 alpn= status=200 /,
        "$release: the access log is on stdout");
    like($stdout, qr/ tls a\.test route=a\.test upstream=\Q$backend\E:443 /, "$release: the TLS connection too");
    unlike($stdout, qr/\[notice\]/, "$release: the error log is not on stdout");
    like($logs, qr/\[notice\] .*table 2 loaded/, "$release: the error log (stderr) has the new table's notice");

    # An empty routes folder: nginx runs, is healthy, and routes nothing.
    my $empty = "$dir/$release.empty";
    mkdir $empty;
    chmod 0755, $empty;
    docker_ok('run', '-d', '--name', "$tag-empty", '--network', $tag,
        '-v', "$empty:/etc/nginx/edge/routes.d:ro", $image);
    push @containers, "$tag-empty";
    wait_for(sub { health_of("$tag-empty") eq 'healthy' }, "$tag-empty healthy", 120);
    is(exchange(ip_of("$tag-empty"), 80, request('a.test')), '', "$release: empty routes.d: healthy, HTTP not routed");
    my (undef, $error) = tls_exchange(ip_of("$tag-empty"), 443, 'a.test', '');
    like($error, qr/TLS failed/, "$release: empty routes.d: TLS not routed");

    # The backend's replaced nginx.conf took effect (it answered above); it has no
    # edge_status, and the HEALTHCHECK says so.
    wait_for(sub { health_of("$tag-backend") eq 'unhealthy' }, "$tag-backend unhealthy", 120);
    pass("$release: with nginx.conf replaced and no edge_status, the HEALTHCHECK fails");

    # docker stop sends SIGQUIT: nginx stops gracefully and exits 0.
    docker_ok('stop', '-t', '30', "$tag-edge");
    is(docker('inspect', '-f', '{{.State.ExitCode}}', "$tag-edge") =~ s/\s+//gr, '0', "$release: docker stop: nginx exits 0");
    like(docker('logs', "$tag-edge"), qr/signal 3 \(SIGQUIT\) received, shutting down/, "$release: gracefully");
}

done_testing;
